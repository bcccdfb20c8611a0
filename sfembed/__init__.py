"""sfembed: embed large corpora through the SiliconFlow embeddings API at your quota's speed."""
