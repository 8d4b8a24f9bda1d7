"""The generate stage: teacher CoT chains through ray.data.llm, parsed, graded, resumable."""
