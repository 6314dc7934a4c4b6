//! L2: publishing a finished model: GGUF export and the Ollama model store.
