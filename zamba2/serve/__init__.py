"""OpenAI-compatible serving: `protocol` defines the API's JSON, `engine` batches requests on the model,
`server` adapts requests to the engine (`choice`: one choice's text, stop strings, logprobs), `app` holds
the FastAPI routes. Chat templates come from text/chat.py."""
