"""Writes semantic_pairs.jsonl: labelled prompt pairs for the semantic cache's quality command.

Each base question has paraphrases (label 1: the cached answer is right for both) and near
misses (label 0: another entity, a negation, another number, another language). Run from the
repository root: python tests/data/make_semantic_pairs.py
"""

import json
from pathlib import Path

# (question, [paraphrases], [near misses with their kind])
BASES = [
    ("What is the capital of France?", ["Which city is the capital of France?", "What's France's capital city?", "Tell me the capital of France."],
     [("entity", "What is the capital of Germany?"), ("entity", "What is the capital of Spain?"), ("language", "Quelle est la capitale de la France ?"), ("negation", "What is not the capital of France?")]),
    ("How do I reverse a list in Python?", ["How can I reverse a list in Python?", "What is the way to reverse a Python list?", "Python: how do I reverse a list?"],
     [("entity", "How do I reverse a list in JavaScript?"), ("negation", "How do I iterate a list in Python without reversing it?"), ("entity", "How do I sort a list in Python?"), ("language", "Wie kehre ich eine Liste in Python um?")]),
    ("What is 15 times 12?", ["What's 15 multiplied by 12?", "Compute 15 times 12.", "How much is 15 times 12?"],
     [("number", "What is 15 times 13?"), ("number", "What is 16 times 12?"), ("number", "What is 150 times 12?"), ("entity", "What is 15 divided by 12?")]),
    ("Who wrote Pride and Prejudice?", ["Who is the author of Pride and Prejudice?", "Which writer wrote Pride and Prejudice?", "Tell me who wrote Pride and Prejudice."],
     [("entity", "Who wrote Sense and Sensibility?"), ("entity", "Who wrote War and Peace?"), ("language", "¿Quién escribió Orgullo y prejuicio?"), ("entity", "Who directed Pride and Prejudice?")]),
    ("How many days are in a leap year?", ["How many days does a leap year have?", "What is the number of days in a leap year?", "A leap year has how many days?"],
     [("negation", "How many days are in a year that is not a leap year?"), ("entity", "How many weeks are in a leap year?"), ("entity", "How many days are in a lunar month?"), ("language", "Combien de jours y a-t-il dans une année bissextile ?")]),
    ("What is the boiling point of water in Celsius?", ["At what temperature in Celsius does water boil?", "Water boils at how many degrees Celsius?", "What's the boiling point of water in Celsius?"],
     [("entity", "What is the boiling point of water in Fahrenheit?"), ("entity", "What is the freezing point of water in Celsius?"), ("entity", "What is the boiling point of ethanol in Celsius?"), ("language", "Was ist der Siedepunkt von Wasser in Celsius?")]),
    ("Translate 'good morning' into Spanish.", ["How do you say 'good morning' in Spanish?", "What is 'good morning' in Spanish?", "Give me the Spanish for 'good morning'."],
     [("entity", "Translate 'good morning' into Italian."), ("entity", "Translate 'good night' into Spanish."), ("entity", "Translate 'good morning' into Japanese."), ("negation", "Translate 'not good morning' into Spanish.")]),
    ("Give me 3 tips for better sleep.", ["Share 3 tips to sleep better.", "What are 3 tips for sleeping better?", "List 3 ways to get better sleep."],
     [("number", "Give me 5 tips for better sleep."), ("number", "Give me 10 tips for better sleep."), ("entity", "Give me 3 tips for better focus."), ("negation", "Give me 3 things that do not help sleep.")]),
    ("What is the population of Tokyo?", ["How many people live in Tokyo?", "What's Tokyo's population?", "How large is the population of Tokyo?"],
     [("entity", "What is the population of Osaka?"), ("entity", "What is the population of Kyoto?"), ("entity", "What is the area of Tokyo?"), ("language", "東京の人口は何人ですか？")]),
    ("Is it safe to eat raw eggs?", ["Can I safely eat raw eggs?", "Are raw eggs safe to eat?", "Is eating raw eggs safe?"],
     [("negation", "Why is it not safe to eat raw eggs?"), ("entity", "Is it safe to eat raw chicken?"), ("entity", "Is it safe to eat raw fish?"), ("language", "Est-il sûr de manger des œufs crus ?")]),
    ("When did World War II end?", ["In what year did World War II end?", "What year did the Second World War end?", "When was the end of World War II?"],
     [("number", "When did World War I end?"), ("entity", "When did World War II start?"), ("entity", "When did the Korean War end?"), ("language", "Wann endete der Zweite Weltkrieg?")]),
    ("Convert 100 dollars to euros.", ["How much is 100 dollars in euros?", "What are 100 dollars in euros?", "Change 100 dollars into euros."],
     [("number", "Convert 200 dollars to euros."), ("number", "Convert 1000 dollars to euros."), ("entity", "Convert 100 euros to dollars."), ("entity", "Convert 100 dollars to yen.")]),
    ("What are the symptoms of diabetes?", ["What symptoms does diabetes cause?", "Which symptoms indicate diabetes?", "List the symptoms of diabetes."],
     [("entity", "What are the symptoms of asthma?"), ("entity", "What are the causes of diabetes?"), ("entity", "What are the treatments for diabetes?"), ("language", "¿Cuáles son los síntomas de la diabetes?")]),
    ("How tall is Mount Everest?", ["What is the height of Mount Everest?", "How high is Mount Everest?", "What's Mount Everest's height?"],
     [("entity", "How tall is Mount Kilimanjaro?"), ("entity", "How tall is K2?"), ("entity", "How old is Mount Everest?"), ("language", "Quelle est la hauteur du mont Everest ?")]),
    ("Write a haiku about autumn.", ["Compose a haiku about autumn.", "Can you write an autumn haiku?", "Write me a haiku on autumn."],
     [("entity", "Write a haiku about spring."), ("entity", "Write a limerick about autumn."), ("entity", "Write a sonnet about autumn."), ("negation", "Write a haiku that is not about autumn.")]),
    ("How do I make a cup of green tea?", ["How should I brew a cup of green tea?", "What's the way to make a cup of green tea?", "How to make a cup of green tea?"],
     [("entity", "How do I make a cup of black tea?"), ("entity", "How do I make a cup of coffee?"), ("number", "How do I make 10 cups of green tea?"), ("language", "Wie mache ich eine Tasse grünen Tee?")]),
    ("What does HTTP status 404 mean?", ["What is the meaning of HTTP status 404?", "What does a 404 HTTP status mean?", "Explain HTTP status 404."],
     [("number", "What does HTTP status 403 mean?"), ("number", "What does HTTP status 500 mean?"), ("number", "What does HTTP status 401 mean?"), ("number", "What does HTTP status 302 mean?")]),
    ("Should I use tabs or spaces in Python?", ["In Python, should I indent with tabs or spaces?", "Tabs or spaces for Python code?", "Is it better to use tabs or spaces in Python?"],
     [("entity", "Should I use tabs or spaces in Go?"), ("entity", "Should I use tabs or spaces in Makefiles?"), ("negation", "Why should I never mix tabs and spaces in Python?"), ("language", "Soll ich in Python Tabs oder Leerzeichen verwenden?")]),
    ("Who painted the Mona Lisa?", ["Which artist painted the Mona Lisa?", "Who is the painter of the Mona Lisa?", "Tell me who painted the Mona Lisa."],
     [("entity", "Who painted The Starry Night?"), ("entity", "Who painted The Last Supper?"), ("entity", "Who stole the Mona Lisa?"), ("language", "Qui a peint la Joconde ?")]),
    ("What is the speed of light?", ["How fast does light travel?", "What's the speed of light?", "At what speed does light travel?"],
     [("entity", "What is the speed of sound?"), ("entity", "What is the speed of light in water?"), ("entity", "What is the speed of the Earth around the Sun?"), ("language", "Wie schnell ist das Licht?")]),
    ("Recommend a book about machine learning for beginners.", ["Suggest a beginner book on machine learning.", "What is a good machine learning book for beginners?", "Can you recommend a machine learning book for beginners?"],
     [("entity", "Recommend a book about machine learning for experts."), ("entity", "Recommend a book about cooking for beginners."), ("entity", "Recommend a course about machine learning for beginners."), ("negation", "Recommend a book that is not about machine learning.")]),
    ("How many legs does a spider have?", ["How many legs do spiders have?", "What's the number of legs on a spider?", "A spider has how many legs?"],
     [("entity", "How many legs does an ant have?"), ("entity", "How many legs does a crab have?"), ("entity", "How many eyes does a spider have?"), ("language", "Combien de pattes a une araignée ?")]),
    ("What is the square root of 144?", ["What's the square root of 144?", "Compute the square root of 144.", "Find the square root of 144."],
     [("number", "What is the square root of 169?"), ("number", "What is the square root of 12?"), ("entity", "What is the cube root of 144?"), ("number", "What is the square root of 1440?")]),
    ("Explain how vaccines work.", ["How do vaccines work?", "Can you explain the way vaccines work?", "Describe how vaccines work."],
     [("entity", "Explain how antibiotics work."), ("negation", "Explain why vaccines do not cause autism."), ("entity", "Explain how vaccines are made."), ("language", "Erkläre, wie Impfstoffe funktionieren.")]),
    ("What time zone is London in?", ["Which time zone is London in?", "What's London's time zone?", "London is in which time zone?"],
     [("entity", "What time zone is New York in?"), ("entity", "What time zone is Paris in?"), ("entity", "What time zone is Sydney in?"), ("language", "¿En qué zona horaria está Londres?")]),
    ("How do I center a div in CSS?", ["How can I center a div with CSS?", "What's the way to center a div in CSS?", "CSS: how do I center a div?"],
     [("entity", "How do I center a div in Tailwind?"), ("negation", "How do I stop a div from being centered in CSS?"), ("entity", "How do I hide a div in CSS?"), ("entity", "How do I center a table in HTML?")]),
    ("Is a tomato a fruit?", ["Is the tomato a fruit?", "Are tomatoes fruits?", "Does a tomato count as a fruit?"],
     [("entity", "Is a cucumber a fruit?"), ("entity", "Is a tomato a vegetable?"), ("negation", "Why is a tomato not a fruit?"), ("entity", "Is an avocado a fruit?")]),
    ("What is the distance from the Earth to the Moon?", ["How far is the Moon from the Earth?", "How far away is the Moon from Earth?", "What's the distance between the Earth and the Moon?"],
     [("entity", "What is the distance from the Earth to Mars?"), ("entity", "What is the distance from the Earth to the Sun?"), ("entity", "What is the distance from Venus to the Moon?"), ("language", "Quelle est la distance de la Terre à la Lune ?")]),
    ("Summarize the plot of Hamlet in 2 sentences.", ["Give me a 2 sentence summary of Hamlet's plot.", "Summarize Hamlet's plot in 2 sentences.", "In 2 sentences, summarize the plot of Hamlet."],
     [("number", "Summarize the plot of Hamlet in 5 sentences."), ("entity", "Summarize the plot of Macbeth in 2 sentences."), ("entity", "Summarize the plot of Othello in 2 sentences."), ("number", "Summarize the plot of Hamlet in 10 sentences.")]),
    ("What is the chemical formula of table salt?", ["What's the chemical formula for table salt?", "Give the chemical formula of table salt.", "Which chemical formula does table salt have?"],
     [("entity", "What is the chemical formula of sugar?"), ("entity", "What is the chemical formula of baking soda?"), ("entity", "What is the melting point of table salt?"), ("language", "Was ist die chemische Formel von Kochsalz?")]),
    ("How long should I boil an egg for a soft yolk?", ["How many minutes do I boil an egg for a soft yolk?", "For a soft yolk, how long should an egg boil?", "How long to boil an egg for a runny soft yolk?"],
     [("entity", "How long should I boil an egg for a hard yolk?"), ("entity", "How long should I fry an egg for a soft yolk?"), ("negation", "Why should I not boil an egg for a soft yolk?"), ("number", "How long should I boil 12 eggs for a soft yolk?")]),
    ("Which planet is the largest in our solar system?", ["What is the largest planet in our solar system?", "Which is the biggest planet in the solar system?", "Name the largest planet in our solar system."],
     [("entity", "Which planet is the smallest in our solar system?"), ("entity", "Which planet is the hottest in our solar system?"), ("entity", "Which moon is the largest in our solar system?"), ("language", "¿Cuál es el planeta más grande del sistema solar?")]),
    ("Can dogs eat chocolate?", ["Is chocolate safe for dogs to eat?", "Is it okay for dogs to eat chocolate?", "Are dogs allowed to eat chocolate?"],
     [("entity", "Can cats eat chocolate?"), ("entity", "Can dogs eat grapes?"), ("entity", "Can dogs eat carrots?"), ("language", "Dürfen Hunde Schokolade essen?")]),
    ("What is the difference between TCP and UDP?", ["How does TCP differ from UDP?", "What's the difference between TCP and UDP?", "Explain the difference between TCP and UDP."],
     [("entity", "What is the difference between HTTP and HTTPS?"), ("entity", "What is the difference between IPv4 and IPv6?"), ("entity", "What is the difference between TCP and QUIC?"), ("language", "Quelle est la différence entre TCP et UDP ?")]),
    ("Set a reminder for 7 am tomorrow.", ["Remind me at 7 am tomorrow.", "Create a reminder for tomorrow at 7 am.", "Please set a reminder for tomorrow, 7 am."],
     [("number", "Set a reminder for 8 am tomorrow."), ("number", "Set a reminder for 7 pm tomorrow."), ("negation", "Do not set a reminder for 7 am tomorrow."), ("number", "Set a reminder for 6 am tomorrow.")]),
    ("How do I delete a git branch?", ["How can I delete a git branch?", "What's the command to delete a git branch?", "Git: how do I delete a branch?"],
     [("entity", "How do I rename a git branch?"), ("entity", "How do I create a git branch?"), ("entity", "How do I delete a git tag?"), ("negation", "How do I keep a git branch from being deleted?")]),
    ("What is the currency of Japan?", ["Which currency does Japan use?", "What's Japan's currency?", "What money is used in Japan?"],
     [("entity", "What is the currency of China?"), ("entity", "What is the currency of Korea?"), ("entity", "What is the language of Japan?"), ("language", "Quelle est la monnaie du Japon ?")]),
    ("Give me a recipe for vegan pancakes.", ["Share a vegan pancake recipe.", "What's a good recipe for vegan pancakes?", "How do I make vegan pancakes?"],
     [("entity", "Give me a recipe for vegan waffles."), ("negation", "Give me a recipe for pancakes that are not vegan."), ("entity", "Give me a recipe for gluten-free pancakes."), ("language", "Dame una receta de tortitas veganas.")]),
    ("How many calories are in a banana?", ["How many calories does a banana have?", "What is the calorie count of a banana?", "A banana contains how many calories?"],
     [("entity", "How many calories are in an apple?"), ("entity", "How much potassium is in a banana?"), ("number", "How many calories are in 3 bananas?"), ("language", "Wie viele Kalorien hat eine Banane?")]),
    ("What year did the Berlin Wall fall?", ["When did the Berlin Wall fall?", "In which year did the Berlin Wall come down?", "The Berlin Wall fell in what year?"],
     [("entity", "What year was the Berlin Wall built?"), ("entity", "What year did the Soviet Union fall?"), ("entity", "What year did the Great Wall get built?"), ("language", "In welchem Jahr fiel die Berliner Mauer?")]),
    ("Is it going to rain in Seattle tomorrow?", ["Will it rain in Seattle tomorrow?", "Is rain expected in Seattle tomorrow?", "Does the forecast show rain in Seattle tomorrow?"],
     [("entity", "Is it going to rain in Portland tomorrow?"), ("entity", "Is it going to snow in Seattle tomorrow?"), ("entity", "Is it going to rain in Seattle today?"), ("negation", "Is it not going to rain in Seattle tomorrow?")]),
    ("What's a good name for a golden retriever?", ["Suggest a good name for a golden retriever.", "What should I name my golden retriever?", "Give me a name for a golden retriever."],
     [("entity", "What's a good name for a black cat?"), ("entity", "What's a good name for a goldfish?"), ("number", "What are 5 good names for a golden retriever?"), ("language", "¿Qué nombre le pongo a un golden retriever?")]),
    ("Explain recursion to a 5 year old.", ["How would you explain recursion to a 5 year old?", "Explain recursion for a 5 year old.", "Describe recursion so a 5 year old understands."],
     [("number", "Explain recursion to a 15 year old."), ("entity", "Explain recursion to a software engineer."), ("entity", "Explain inheritance to a 5 year old."), ("language", "Erkläre Rekursion einem 5 Jahre alten Kind.")]),
    ("What is the tallest building in the world?", ["Which building is the tallest in the world?", "What's the world's tallest building?", "Name the tallest building in the world."],
     [("entity", "What is the tallest building in Europe?"), ("entity", "What is the oldest building in the world?"), ("entity", "What is the tallest tree in the world?"), ("language", "Quel est le plus haut bâtiment du monde ?")]),
    ("How do I install numpy with pip?", ["How can I pip install numpy?", "What's the pip command to install numpy?", "Install numpy using pip: how?"],
     [("entity", "How do I install pandas with pip?"), ("entity", "How do I install numpy with conda?"), ("entity", "How do I uninstall numpy with pip?"), ("negation", "How do I avoid installing numpy with pip?")]),
    ("What is the largest ocean on Earth?", ["Which ocean is the largest on Earth?", "What's the biggest ocean on Earth?", "Name the largest ocean on Earth."],
     [("entity", "What is the smallest ocean on Earth?"), ("entity", "What is the deepest ocean on Earth?"), ("entity", "What is the largest desert on Earth?"), ("language", "¿Cuál es el océano más grande de la Tierra?")]),
    ("Write a SQL query to count rows in a table.", ["How do I count the rows in a table with SQL?", "Give me a SQL query that counts the rows of a table.", "SQL query to count a table's rows?"],
     [("entity", "Write a SQL query to delete rows in a table."), ("entity", "Write a SQL query to count columns in a table."), ("negation", "Write a SQL query to count rows that are not null in a table."), ("entity", "Write a Python script to count rows in a table.")]),
    ("Who was the first person on the Moon?", ["Who first walked on the Moon?", "Who was the first human to walk on the Moon?", "Who landed on the Moon first?"],
     [("number", "Who was the second person on the Moon?"), ("entity", "Who was the first person in space?"), ("entity", "Who was the first person on Mars?"), ("language", "Wer war der erste Mensch auf dem Mond?")]),
    ("What is the minimum wage in California?", ["What's California's minimum wage?", "How much is the minimum wage in California?", "What is California's minimum wage?"],
     [("entity", "What is the minimum wage in Texas?"), ("entity", "What is the minimum wage in New York?"), ("entity", "What is the average wage in California?"), ("number", "What was the minimum wage in California in 2010?")]),
    ("How do I write a for loop in Rust?", ["How can I write a for loop in Rust?", "What's the syntax of a for loop in Rust?", "Rust: how do I write a for loop?"],
     [("entity", "How do I write a for loop in C?"), ("entity", "How do I write a while loop in Rust?"), ("entity", "How do I write a for loop in Bash?"), ("negation", "How do I iterate in Rust without a for loop?")]),
    ("What is the speed limit on German highways?", ["How fast can you drive on German highways?", "Is there a speed limit on German highways?", "What's the speed limit on the German highways?"],
     [("entity", "What is the speed limit on French highways?"), ("entity", "What is the speed limit on Italian highways?"), ("entity", "What is the speed limit in German cities?"), ("language", "Gibt es ein Tempolimit auf deutschen Autobahnen?")]),
    ("Sort these numbers: 5, 2, 9, 1.", ["Put these numbers in order: 5, 2, 9, 1.", "Order the numbers 5, 2, 9, 1.", "Please sort 5, 2, 9, 1."],
     [("number", "Sort these numbers: 5, 2, 9, 7."), ("number", "Sort these numbers: 6, 2, 9, 1."), ("entity", "Sort these numbers in descending order: 5, 2, 9, 1."), ("entity", "Sum these numbers: 5, 2, 9, 1.")]),
]


# Written after the guard was tuned on BASES, and never tuned on: an honest estimate.
HELD_OUT = [
    ("What is the capital of Australia?", ["Which city is Australia's capital?", "Tell me the capital of Australia.", "What's the capital city of Australia?"],
     [("entity", "What is the capital of Austria?"), ("entity", "What is the largest city of Australia?"), ("language", "Was ist die Hauptstadt von Australien?"), ("negation", "Why is Sydney not the capital of Australia?")]),
    ("How do I read a file line by line in Python?", ["How can I read a file line by line in Python?", "Python: read a file line by line?", "What's the way to read a file line by line in Python?"],
     [("entity", "How do I write a file line by line in Python?"), ("entity", "How do I read a file line by line in Java?"), ("entity", "How do I read a file word by word in Python?"), ("negation", "How do I read a file in Python without loading it line by line?")]),
    ("What is 7 plus 8?", ["How much is 7 plus 8?", "Compute 7 plus 8.", "What's 7 plus 8?"],
     [("number", "What is 7 plus 9?"), ("number", "What is 17 plus 8?"), ("entity", "What is 7 minus 8?"), ("entity", "What is 7 times 8?")]),
    ("Who discovered penicillin?", ["Which scientist discovered penicillin?", "Who was the discoverer of penicillin?", "Tell me who discovered penicillin."],
     [("entity", "Who discovered insulin?"), ("entity", "Who discovered radium?"), ("entity", "When was penicillin discovered?"), ("language", "Qui a découvert la pénicilline ?")]),
    ("How do I make cold brew coffee?", ["How can I make cold brew coffee?", "What is the way to make cold brew coffee?", "Cold brew coffee: how do I make it?"],
     [("entity", "How do I make iced tea?"), ("entity", "How do I make espresso coffee?"), ("entity", "How do I store cold brew coffee?"), ("language", "Wie mache ich Cold Brew Kaffee?")]),
    ("What is the melting point of iron?", ["At what temperature does iron melt?", "What's the melting point of iron?", "Iron melts at what temperature?"],
     [("entity", "What is the melting point of gold?"), ("entity", "What is the boiling point of iron?"), ("entity", "What is the melting point of ice?"), ("language", "Quel est le point de fusion du fer ?")]),
    ("List 4 benefits of regular exercise.", ["What are 4 benefits of regular exercise?", "Give me 4 benefits of regular exercise.", "Name 4 benefits of exercising regularly."],
     [("number", "List 6 benefits of regular exercise."), ("negation", "List 4 risks of not exercising."), ("entity", "List 4 benefits of regular meditation."), ("entity", "List 4 dangers of regular exercise.")]),
    ("When was the Eiffel Tower built?", ["In what year was the Eiffel Tower built?", "What year was the Eiffel Tower constructed?", "When did they build the Eiffel Tower?"],
     [("entity", "When was the Statue of Liberty built?"), ("entity", "Why was the Eiffel Tower built?"), ("entity", "Where was the Eiffel Tower built?"), ("language", "Wann wurde der Eiffelturm gebaut?")]),
    ("How do I undo the last git commit?", ["How can I undo the last git commit?", "What's the way to undo my last git commit?", "Git: undo the last commit?"],
     [("entity", "How do I undo the last git merge?"), ("entity", "How do I amend the last git commit?"), ("number", "How do I undo the last 3 git commits?"), ("negation", "How do I keep the last git commit but not push it?")]),
    ("Is coffee bad for your heart?", ["Is coffee harmful to the heart?", "Does coffee hurt your heart?", "Is drinking coffee bad for your heart?"],
     [("entity", "Is tea bad for your heart?"), ("entity", "Is coffee bad for your teeth?"), ("entity", "Is coffee good for your heart?"), ("language", "¿Es el café malo para el corazón?")]),
]


# Written after the who/when/where/why rule (which HELD_OUT prompted) and never tuned on.
FRESH = [
    ("How do I convert a string to an integer in JavaScript?", ["How can I convert a string to an integer in JavaScript?", "JavaScript: converting a string to an integer?", "What's the way to turn a string into an integer in JavaScript?"],
     [("entity", "How do I convert an integer to a string in JavaScript?"), ("entity", "How do I convert a string to an integer in Go?"), ("entity", "How do I convert a string to a float in JavaScript?"), ("negation", "How do I stop JavaScript from converting a string to an integer?")]),
    ("What are the side effects of ibuprofen?", ["Which side effects does ibuprofen have?", "What side effects can ibuprofen cause?", "List the side effects of ibuprofen."],
     [("entity", "What are the side effects of aspirin?"), ("entity", "What are the benefits of ibuprofen?"), ("number", "What are the side effects of 800 mg of ibuprofen?"), ("language", "Quels sont les effets secondaires de l'ibuprofène ?")]),
    ("How many players are on a soccer team?", ["How many players does a soccer team have?", "A soccer team has how many players?", "What is the number of players on a soccer team?"],
     [("entity", "How many players are on a basketball team?"), ("entity", "How many players are on a rugby team?"), ("entity", "How many substitutes are on a soccer team?"), ("language", "¿Cuántos jugadores hay en un equipo de fútbol?")]),
    ("Write a short poem about the sea.", ["Compose a short poem about the sea.", "Can you write a short poem about the sea?", "Write me a short sea poem."],
     [("entity", "Write a short poem about the mountains."), ("entity", "Write a long poem about the sea."), ("entity", "Write a short story about the sea."), ("negation", "Write a short poem that never mentions the sea.")]),
    ("What is the GDP of Brazil?", ["What's Brazil's GDP?", "How large is the GDP of Brazil?", "Tell me the GDP of Brazil."],
     [("entity", "What is the GDP of Argentina?"), ("entity", "What is the population of Brazil?"), ("number", "What was the GDP of Brazil in 1990?"), ("language", "Qual é o PIB do Brasil?")]),
    ("How do I clean a cast iron pan?", ["How should I clean a cast iron pan?", "What's the best way to clean a cast iron pan?", "Cleaning a cast iron pan: how?"],
     [("entity", "How do I season a cast iron pan?"), ("entity", "How do I clean a nonstick pan?"), ("negation", "What should I never use to clean a cast iron pan?"), ("entity", "How do I clean a cast iron grill?")]),
    ("Who won the 2018 FIFA World Cup?", ["Which team won the 2018 FIFA World Cup?", "Who was the winner of the 2018 FIFA World Cup?", "Tell me who won the 2018 FIFA World Cup."],
     [("number", "Who won the 2014 FIFA World Cup?"), ("number", "Who won the 2022 FIFA World Cup?"), ("entity", "Who hosted the 2018 FIFA World Cup?"), ("entity", "Who won the 2018 Rugby World Cup?")]),
    ("Explain the difference between a virus and a bacterium.", ["What is the difference between a virus and a bacterium?", "How does a virus differ from a bacterium?", "Explain how a virus and a bacterium differ."],
     [("entity", "Explain the difference between a virus and a fungus."), ("entity", "Explain the difference between a bacterium and a parasite."), ("entity", "Explain the similarity between a virus and a bacterium."), ("language", "Erkläre den Unterschied zwischen einem Virus und einem Bakterium.")]),
    ("How long does it take to fly from London to New York?", ["How long is the flight from London to New York?", "What's the flight time from London to New York?", "How many hours is a flight from London to New York?"],
     [("entity", "How long does it take to fly from London to Tokyo?"), ("entity", "How long does it take to sail from London to New York?"), ("entity", "How much does it cost to fly from London to New York?"), ("language", "Combien de temps dure le vol de Londres à New York ?")]),
    ("Suggest 2 names for a coffee shop.", ["Give me 2 names for a coffee shop.", "What are 2 good names for a coffee shop?", "Can you suggest 2 coffee shop names?"],
     [("number", "Suggest 10 names for a coffee shop."), ("entity", "Suggest 2 names for a bookshop."), ("entity", "Suggest 2 slogans for a coffee shop."), ("negation", "Suggest 2 names for a coffee shop that do not use the word coffee.")]),
]


def write(name: str, bases) -> None:
    out = Path(__file__).with_name(name)
    lines = []
    for question, paraphrases, misses in bases:
        for p in paraphrases:
            lines.append({"a": question, "b": p, "label": 1, "kind": "paraphrase"})
        for kind, m in misses:
            lines.append({"a": question, "b": m, "label": 0, "kind": kind})
    out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    print(f"{len(lines)} pairs ({sum(x['label'] for x in lines)} paraphrases) -> {out}")


def main() -> None:
    write("semantic_pairs.jsonl", BASES)
    write("semantic_pairs_heldout.jsonl", HELD_OUT)
    write("semantic_pairs_fresh.jsonl", FRESH)


if __name__ == "__main__":
    main()
