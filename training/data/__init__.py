"""Training's torch-free data side: intake, tagger, captions, dataset folders, run records, scoring, lifecycle."""
