"""Release knowledge: which transformers / DeepSpeed releases are verified or refused (`support`), how each run
of releases spells an EP request (`lines`, `spelling`, `ep_request`), and what the support matrix measured for
each release (`support_table`)."""
