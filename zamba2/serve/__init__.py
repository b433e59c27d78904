"""OpenAI-compatible serving: `engine` batches requests on the model, `protocol` defines the API's JSON,
`chat` renders chat templates, `app` is the FastAPI application that ties them together."""
