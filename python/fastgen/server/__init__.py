"""fastgen's HTTP server: the OpenAI-compatible API and Megatron-LM's `PUT /api`, served by one
FastAPI app over one AsyncLLMEngine (see app.py)."""
