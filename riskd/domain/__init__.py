"""Pure values shared by every layer: money, clock, ids, orders, decisions."""
