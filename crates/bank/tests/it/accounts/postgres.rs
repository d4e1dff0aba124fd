//! Two replicas of `accounts` on one PostgreSQL database.
