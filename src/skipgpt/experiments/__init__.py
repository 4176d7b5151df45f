"""Studies that compose methods: the frontier of quality against measured speed (routers vs ShortGPT
vs LLM-Drop), built on train/, eval/ and baselines/."""
