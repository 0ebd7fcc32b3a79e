"""REST endpoints of the rewards capability (API.md: Rewards, Points holds, Management)."""
