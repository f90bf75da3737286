//! llmem's runtime half: model loading, the Llama forward pass and generation.
