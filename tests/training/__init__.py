"""Tests of the corruption library, the verifier and the reward model, and their training stages."""
