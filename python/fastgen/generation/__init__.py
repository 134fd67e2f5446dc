"""Batch generation over a parquet file of prompts, compatible with verl's generation job: the
config (config.py), the input (data.py), the parts a restarted job resumes from (parts.py), the
torchrun layout (distributed.py) and the run loop (job.py). The command is
fastgen.entrypoints.generate."""
