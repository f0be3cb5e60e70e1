"""Bring existing networks in: Caffe text net definitions and torchvision models become readable
``.cnds`` specs (and their weights cnds checkpoints), so the spec stays the single source of truth."""
