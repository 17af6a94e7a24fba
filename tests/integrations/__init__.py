"""Framework integrations (Flask, Django) against real stores."""
