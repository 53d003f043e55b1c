"""FastV: drop the image tokens that receive the least attention from the last token, inside the LLM."""
