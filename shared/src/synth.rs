//! Seeded generators of realistic payloads: JSON CDRs and SenML sensor readings.
