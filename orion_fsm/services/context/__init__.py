"""Long-context memory: documents and conversations kept outside the model's window, chunked,
indexed (BM25 + embeddings) and retrieved into prompts."""
