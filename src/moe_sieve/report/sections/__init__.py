"""One module per report section (or family of sections); each builds only from data that exists."""
