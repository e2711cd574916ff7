"""Admin endpoints: tenants and their API keys."""
