"""The EDI kernel proper: what runs inside WMLA behind kernel.py (the service, request reading and result
writing, status records, async jobs, engine turns, storage volumes, settings, the model store)."""
