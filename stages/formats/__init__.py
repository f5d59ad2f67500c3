"""Prompt strategies: each module turns raw rows into text segments marked trained or not."""
