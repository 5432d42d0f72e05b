"""Thin adapters from the recipe to each trainer: TRL, transformers' Trainer, Axolotl."""
