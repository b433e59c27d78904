"""Text in and out: the tokenizer (the checkpoint's or Mistral v0.1) and chat templates."""
