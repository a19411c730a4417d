"""Ground a verifier's score in its passage: features, learners that combine them, and the scorer."""
