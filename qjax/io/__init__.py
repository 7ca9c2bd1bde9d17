"""Storage: quantized checkpoints (`checkpoint`), float parameter files
(`sources`) and streamed conversion between them (`convert`)."""
