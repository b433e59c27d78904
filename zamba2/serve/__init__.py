"""OpenAI-compatible serving: `engine` batches requests on the model, `protocol` defines the API's JSON,
`app` is the FastAPI application that ties them together (chat templates come from text/chat.py)."""
