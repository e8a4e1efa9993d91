"""`lmforge eval human`: answers generated once, a web page for pairwise votes and 1–5 ratings, a leaderboard."""
