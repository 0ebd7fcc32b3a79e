"""Rewards write paths: the catalogue, redemptions, vouchers at the till and holds. Import from the submodules."""
