"""Self-contained inference code copied into exported pipeline folders (installed as distill.pipelines)."""
