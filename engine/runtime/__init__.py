"""The runtime: backends, prompts, seed images and the chain (:class:`Engine`); loading an
engine from a model source or an export directory (:func:`load`)."""
