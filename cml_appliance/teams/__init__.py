"""Teams: accounts that own projects, with members in team roles."""
