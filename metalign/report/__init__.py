"""Tables and figures derived only from pipeline outputs (P-65)."""
