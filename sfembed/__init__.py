"""sfembed: embed large corpora through the SiliconFlow embeddings API at the speed of your quota."""
