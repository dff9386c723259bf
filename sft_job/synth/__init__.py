"""Training data from a chat model (`sft-job data synth`) and between formats (`data convert`).

See README.md in this folder; the commands are sft_job/cli/data.py.
"""
