"""OpenAI-compatible serving: `protocol` defines the API's JSON, `engine` batches requests on the model (reusing
states through `prefix_cache`), `server` adapts requests to the engine (`choice`: one choice's text, stop strings,
logprobs), `app` holds the FastAPI routes behind `middleware` (request ids, API key, drain, access log), and
`metrics` the Prometheus counters. Chat templates come from text/chat.py."""
