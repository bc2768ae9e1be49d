"""Minimal paged serving engine on pallaskit kernels (see issue: engine)."""
