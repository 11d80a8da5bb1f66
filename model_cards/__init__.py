"""Model card templates, one per method, filled at export (installed as distill.model_cards)."""
