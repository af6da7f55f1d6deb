"""Adapter methods as pure functions over parameter trees."""
