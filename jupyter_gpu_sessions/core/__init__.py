"""Pure domain layer: models, errors and parsing. No I/O lives here."""
