-- Who closed an incident by hand (`keywarden incident close`); NULL when it finished by itself.
-- A closed incident is never resumed or reopened by a later run of its scope.
ALTER TABLE incidents ADD COLUMN closed_by TEXT;
