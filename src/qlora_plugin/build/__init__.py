"""From a recipe to a trainable model: what is stored in 4 bits, and how it runs."""
