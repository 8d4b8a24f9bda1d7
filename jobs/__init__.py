"""cotd batch jobs: generate, curate, train, evaluate. Each stage is a Ray job (`python -m jobs.<stage>`)."""
