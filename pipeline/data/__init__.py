"""The data plane: declared Arrow schemas, readers for the formats users have, validation, the run store."""
