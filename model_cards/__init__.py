"""Model card templates, one per method plus generic.md for a method without its own, filled at export (installed as
distill.model_cards)."""
