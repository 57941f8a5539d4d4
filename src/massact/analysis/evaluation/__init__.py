"""Scoring the model on an evaluation text: perplexity windows, masked-LM windows, headless encoders' embeddings, and
the batched evaluation every stage that measures an intervention's cost shares."""
