"""The embedded default (`make demo`): its run (demo), the warm-up of its
small "pretrained" tower (tower_pretrain), and the check that its exports
load in transformers (export_check)."""
