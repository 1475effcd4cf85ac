-- A session's editor (its runtime's, CML's Runtime.editor): '' for what sessions always had (a
-- terminal and a console, CML's "Workbench"), 'JupyterLab' for a JupyterLab served through the
-- editors' listener (editors/).
ALTER TABLE workloads ADD COLUMN editor text NOT NULL DEFAULT '';
