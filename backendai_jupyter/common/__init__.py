"""What two or more parts share: resource slots, states, signing, wire types, errors."""
