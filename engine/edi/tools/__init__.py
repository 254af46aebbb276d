"""Client-side tools: the EDI client and the cohort it submits, the dlim deployment, submission packaging."""
