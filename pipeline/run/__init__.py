"""Running a run: the stage graph, the spec, which attempt runs, one attempt's execution, the runner, the Ray scheduler and executor, job submission, gc and the console.
"""
